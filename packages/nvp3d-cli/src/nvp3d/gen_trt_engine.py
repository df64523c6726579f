"""`nvp3d gen_trt_engine`: build TensorRT engines from the exported ONNX graphs (see nvp3d.export)."""

from nvp3d.export import run_gen_trt_engine as run

__all__ = ["run"]

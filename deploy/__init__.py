"""Deployment: export to ONNX / OpenVINO with a JSON sidecar (`export`, `sidecar`, `graph`) and the inference
backends that run an export in `-mode eval` / `-mode infer` (`backends`)."""

"""Parity with the official TensorFlow code: `python -m parity.tf_parity FIXTURE_DIR` compares the port with the
outputs of the official code in a `../shared/fixtures` folder. It drives the whole pipeline (data, training
step, evaluation), so it sits above `train/` and `eval/`."""

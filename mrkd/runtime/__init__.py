"""What training, evaluation and serving share above the method: pretrained weights, checkpoints, calibration,
the Detector, metrics, the training loop, evaluation and plots. Imports mrkd.model, mrkd.data, mrkd.core, mrkd.ops."""

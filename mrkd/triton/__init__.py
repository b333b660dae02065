"""Deployment on Triton Inference Server: repository rendering and export, the tritonserver launcher, and the
python-backend model classes that the generated model.py files import. Imports mrkd.runtime and mrkd.core."""

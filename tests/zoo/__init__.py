"""Tests of dq.zoo: the embedded model and the model-folder loader."""

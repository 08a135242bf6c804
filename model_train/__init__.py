"""ctdx model_train."""

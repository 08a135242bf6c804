"""ctdx model_train/method."""

"""ctdx worker."""

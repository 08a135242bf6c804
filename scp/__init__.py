"""ctdx scp."""

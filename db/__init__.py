"""Foundation shared by every ctdx service: settings, logging, the database and the CLI root."""

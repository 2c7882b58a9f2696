"""Training, datasets and evaluation for vitca. Imports the model; the model never imports this package."""

"""pneumoct: explainable pneumonia screening from chest CT (research use only, not a medical device)."""
__version__ = "0.1.0"

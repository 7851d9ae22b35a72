"""Data preparation: windowing, the prepared store and its split, prompts, phantoms, torch datasets."""

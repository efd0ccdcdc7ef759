"""Input pipelines: text cleaning and tokenization (more to come with the data issue)."""

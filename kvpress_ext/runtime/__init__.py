"""Running models under a press: model names and loading, chat prompts, the generation loop, the pipeline."""

"""Floor 3: classifiers, fine-tuning, evaluation, a project's trained models and prediction."""

"""Scoring a model or K members on prepared ARC questions: generation, the answer log-prob, the evaluator."""

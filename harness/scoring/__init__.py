"""What produces a score, and is frozen for a session: the trainer's contract, the clock, the
runner that holds the budget, the evaluator process and its metric."""

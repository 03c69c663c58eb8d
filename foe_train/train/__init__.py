"""Training: the job (job.py), one step and its metrics (step.py), validation
(evaluation.py), the run lifecycle (loop.py), checkpoints, tracking and preflight checks;
``python -m foe_train.train`` is one rank."""

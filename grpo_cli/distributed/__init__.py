"""torchrun: the processes and their collectives, the policy as every process holds it."""

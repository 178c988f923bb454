"""The networks and what is computed on them: IF-neuron spiking models (models), the re-KD losses (losses),
magnitude pruning (prune), the pruned and virtual teachers and their cache (teachers), synaptic operations
and energy (energy). Imports neither Ray nor MLflow."""

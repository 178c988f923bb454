"""The networks and what is computed on them: IF-neuron spiking models (models), the re-KD losses (losses),
magnitude pruning (prune), the pruned and virtual teachers and their cache (teachers), sparse students'
masks grown and pruned while they learn (structure), synaptic operations and energy (energy). Imports
neither Ray nor MLflow."""

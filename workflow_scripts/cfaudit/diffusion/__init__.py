"""The class-conditional diffusion generator: schedule, samplers, SDEdit counterfactuals, training, benchmark."""

"""The GAN baseline of DeGrave et al. 2023: networks, checkpoint layout, training, counterfactuals."""

"""Generation unlearning: SalUn, ESD, FMN, GA and Retrain for class-conditional DDPMs and Stable Diffusion."""

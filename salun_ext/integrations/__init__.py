"""Drop-ins for other training stacks: salun_ext's masks and masked optimizers where their users already train.

transformers.py   SalUnTrainer: a Hugging Face Trainer whose updates touch only the salient weights
"""

"""Classification unlearning methods, one small class each on the shared Engine (registered in ../registry.py).

Paper (Table 1): retrain, ft, rl, ga, iu, be, bs, l1_sparse, salun, salun_soft. Beyond: scrub, neggrad_plus, ssd.
Every method's Config dataclass documents its defaults (the paper's recipe for CIFAR-10 / ResNet-18).
"""

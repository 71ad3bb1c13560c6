"""Generation unlearning: SalUn, ESD, FMN, GA and Retrain for class-conditional DDPMs and Stable Diffusion.

core.py       conditioning ids, noising, guidance, DiffusionSet / DiffusionSpec, batches
ddpm.py, sd.py   the two model families (diffusers)
tasks.py      the objectives as Tasks (EpsTask, SalUnTask, GATask, ESDTask, FMNTask)
methods.py    METHODS: one class per method (its Task, its trained parameters); unlearn(), run_task()
recipes.py    the paper's defaults per (setting, method) and per model kind
data.py       ModelSource, ForgetData -> the forget / retain sets
saliency.py   SalUn's mask;  evaluation.py  UA, Fréchet distance, the scoring classifier, grids
workflows.py  what each `salun-ext diffusion` subcommand does;  sharding.py  FSDP2 for UNets
"""

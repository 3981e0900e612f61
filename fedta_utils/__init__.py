"""fedta_utils: federated learning under the lens of task arithmetic.

One small package that the numbered notebooks import. Modules by concept:

    data          CIFAR-100 / synthetic images as device tensors, splits, batches
    sharding      iid, non-iid (exactly Nc classes) and Dirichlet client shards
    models        DINO ViT-S/16 (timm, torch.hub or a local file) and tiny_vit
    optim         SparseSGDM: SGD with momentum that never moves frozen entries
    sensitivity   diagonal Fisher scores and multi-round mask calibration (TaLoS)
    heads         closed-form ridge head (federated exactly) and linear probe
    training      centralized fine-tuning and evaluation
    federated     FedAvg / FedAvgM, sequentially simulated, with drift diagnostics
    runs          run directories: config, atomic checkpoints, metrics, locks
    experiments   the grids each notebook runs
    plots, report figures, booktabs tables and LaTeX number macros
    pipeline      runs the notebooks through papermill (smoke | full profile)
    bench         throughput benchmark of the training, FL, data and Fisher paths
"""

__version__ = "0.1.0"

# Where the notebooks' bootstrap cell clones the project from when the package
# is missing (Colab). Change it in one place if you work from a fork.
REPO_URL = "https://github.com/fedta/fedta"

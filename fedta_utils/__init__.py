"""fedta_utils: federated learning under the lens of task arithmetic.

One small package that the numbered notebooks import. Modules by concept, in import order:

    checks        ConfigError and the checks that name a bad parameter and what is allowed
    runs          run folders: atomic writes, config, checkpoints, metrics, the run lock
    data          CIFAR-100 / synthetic images as device tensors, the split, batches, seed streams
    sharding      iid, non-iid (random sets of exactly Nc classes) and Dirichlet client shards
    models        DINO ViT-S/16 (local file, timm or torch.hub) and tiny_vit; mixed precision
    optim         SparseSGDM (SGD that never moves frozen entries) and learning-rate schedules
    fisher        the diagonal Fisher from per-sample gradients (vmap, and a per-sample reference loop)
    masks         mask rules, TaLoS multi-round calibration, mask statistics and storage
    prepare       steps 0 and 1 of sparse fine-tuning: the federated ridge head and the federated mask
    training      training and evaluation steps, the centralized run
    aggregation   the server's merge rules for the round's deltas: mean, TIES, Fisher-weighted
    fedavg        FedAvg / FedAvgM, FedProx and SCAFFOLD clients: client update, server update, rounds
    workspace     profiles, results folder, device, data, tuned values; setup_notebook
    experiments   the grids each notebook runs
    results       run loaders, statistics over seeds, the selection rule, one function per table
    figures       one function per figure, drawn from the tables of results
    report        the LaTeX report's numbers, tables, PDF and archives
    calibration   the dry-run's calibration: seconds per trained image, evaluated image, Fisher sample
    pipeline      the notebooks through papermill, and the dry-run's cost
    bench         throughput and correctness benchmark, --gpu-check
"""

__version__ = "0.2.0"

# Where the notebooks' first cell clones the project from when the package is missing (Colab);
# every notebook holds a copy (it runs before the package can be imported), checked by a test.
REPO_URL = "https://github.com/fedta/fedta"

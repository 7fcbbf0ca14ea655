"""pretrain_torchx: the TorchX scheduler `pretrainjob` (`scheduler.py`), a client-side plugin that
submits PretrainJobs. Kept out of `pretrain_operator`, whose image carries neither torch nor torchx:
install it with the `torchx` extra (`pip install -e '.[torchx]'`)."""

"""Trainers of other libraries built on HDP's pieces.

- :mod:`hf_hdp.integrations.trl`: :class:`~hf_hdp.integrations.trl.HDPSFTTrainer`, TRL's ``SFTTrainer``
  with Hybrid Data Parallelism (``pip install "hf-hdp[trl]"``), and TRL's RL trainers
  :class:`~hf_hdp.integrations.rl.HDPGRPOTrainer` / :class:`~hf_hdp.integrations.rl.HDPRLOOTrainer`
  (:mod:`hf_hdp.integrations.rl`, also importable from ``hf_hdp.integrations.trl``).

Nothing is imported here, so ``import hf_hdp.integrations`` never needs the optional libraries.
"""

"""Planning a Ling run before it starts: scaling-law hyper-parameters (``ling-plan hparams``) and
per-rank memory of a recipe (``ling-plan memory``)."""

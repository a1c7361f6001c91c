"""Training algorithms that change how an adapter starts or trains rather than what it is: data-driven
initialisations (`inits.initialize`), optimizers registered for recipes, and training-time regularisers.

Importing this package registers its optimizers with `deltatune.train.optimizers`."""

from . import optimizers  # noqa: F401  (registers lorafa, lora_pro, riemannian, galore, flora, lisa, owlore, ...)

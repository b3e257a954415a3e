"""The commands as recipes: each reads top to bottom over the builders of :mod:`mole.build` and the run
directory of :mod:`mole.run_dir` (:mod:`mole.recipes.train`, :mod:`mole.recipes.evaluate`, ...)."""

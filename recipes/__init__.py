"""Named recipes: chains of train.py stages with their settings, and what they share with train.py.

    recipes.flags     every flag of train.py (one parser for the command line and the recipes)
    recipes.stages    the stage runner: a stage's defaults and flag checks, then its loop
    recipes.r1_tiny   the default of `torchrun train.py`: R1's stages at toy scale on 2 CPU cores
"""

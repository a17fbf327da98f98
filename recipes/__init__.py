"""Named recipes: chains of train.py stages with their settings.

    recipes.r1_tiny   the default of `torchrun train.py`: R1's stages at toy scale on 2 CPU cores
"""

"""Datasets that need no download, and partitioners that split them across agents.

scikit-learn's bundled digits and a synthetic factory-sensor generator.
"""

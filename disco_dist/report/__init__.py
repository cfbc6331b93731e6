"""What reports results: the results tables, recipes and their targets, model cards, figures."""

"""One module per optimizer family; each registers its optimizers when imported (see ``l2zo.optim.zoo``)."""

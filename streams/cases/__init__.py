"""Due diligence on held orders: the case state machine and what a closed case produces."""

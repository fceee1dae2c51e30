"""Planning a run before it starts: link and scaling arithmetic (`potluck plan`) and a one-process
simulation of the algorithm against a DDP baseline (`potluck simulate`)."""

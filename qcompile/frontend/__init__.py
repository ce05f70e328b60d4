"""The front end: load a model file, trace it with torch.fx, and state facts about the captured graph."""

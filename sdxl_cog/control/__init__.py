"""Control over composition and style: ControlNet (several at once, ControlNet-Union included) and IP-Adapter image
prompts, and the preprocessors that turn a photo into a control map."""

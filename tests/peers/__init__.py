"""Real peers that tests talk to: servers, pseudo-terminals and scripted devices."""

//! privcmd / evtchn over ioctls (to be filled).

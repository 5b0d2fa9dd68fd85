"""The MSGin5G-2/-4 link: our client of MSGS_*, our server of MSGG_*, and registration."""

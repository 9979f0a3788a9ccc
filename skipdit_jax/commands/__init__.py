"""One module per `skipdit` command: `USAGE`, `define_flags(flag_values)`, `main(args, flags)`."""

from gpulocker.cli.main import main

main()

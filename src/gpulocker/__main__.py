from gpulocker.cli import main

main()

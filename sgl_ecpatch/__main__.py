from sgl_ecpatch.cli import main

main()

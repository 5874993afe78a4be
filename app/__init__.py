"""The ecif Streamlit app, installed as the ``ecif_app`` package (see setup.py).

Start it with ``ecif app``, which runs ``main.py`` with ``streamlit run``; in a checkout
``streamlit run app/main.py`` works too.
"""

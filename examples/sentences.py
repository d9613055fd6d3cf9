"""English sentences for evaluating and calibrating pruned sentence encoders.

``EVAL_SENTENCES`` covers many topics and contains several loose paraphrase
pairs, so that the pairwise similarity structure of the embeddings is
informative.  ``CALIBRATION_SENTENCES`` is disjoint from it and is meant for
activation-aware pruning (e.g. Wanda) only.
"""

EVAL_SENTENCES = (
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is playing the guitar on stage.",
    "Someone is performing music with a guitar in front of an audience.",
    "The cat is sleeping on the windowsill.",
    "A kitten naps in the warm sunlight by the window.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "She is baking bread in the kitchen.",
    "Fresh loaves are coming out of the oven.",
    "The train to Berlin was delayed by two hours.",
    "Our flight was cancelled because of the storm.",
    "Regular exercise improves cardiovascular health.",
    "Running a few times a week is good for your heart.",
    "The new smartphone has a faster processor and a better camera.",
    "Python is a popular programming language for data science.",
    "Many machine learning researchers write their code in Python.",
    "The children are building a sandcastle on the beach.",
    "Kids play with buckets and spades by the sea.",
    "The museum exhibits paintings from the Renaissance period.",
    "Astronomers discovered a new planet orbiting a distant star.",
    "A telescope revealed an exoplanet around another sun.",
    "The restaurant serves authentic Italian pasta.",
    "I ordered spaghetti carbonara for dinner.",
    "The hospital opened a new wing for cancer treatment.",
    "The football team won the championship last night.",
    "Fans celebrated in the streets after the final whistle.",
    "Climate change is causing glaciers to melt faster.",
    "Rising temperatures are shrinking the polar ice caps.",
    "He forgot his umbrella and got soaked in the rain.",
    "The library is closed on public holidays.",
    "Please remember to water the plants while I am away.",
    "The company announced record profits for the third quarter.",
    "Quarterly earnings exceeded analysts' expectations.",
    "The violinist practised scales for three hours.",
    "A strong earthquake shook the coastal city this morning.",
    "The bridge was closed for repairs after the flood.",
    "My grandmother tells wonderful stories about her childhood.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Electric cars are becoming cheaper every year.",
    "Battery-powered vehicles keep getting more affordable.",
    "The professor explained the theory of relativity.",
    "Students listened to a lecture on Einstein's physics.",
    "The dog chased the ball across the park.",
    "A puppy runs after a tennis ball on the grass.",
    "Vaccines have dramatically reduced childhood mortality.",
    "The software update fixed several security vulnerabilities.",
    "Hackers exploited a bug in the old version of the program.",
    "The mountain trail offers breathtaking views of the valley.",
    "We hiked to the summit and admired the scenery.",
    "The court ruled that the contract was invalid.",
    "The judge dismissed the lawsuit for lack of evidence.",
    "Coffee prices have risen because of poor harvests.",
    "She painted the fence bright blue.",
    "The orchestra played a symphony by Beethoven.",
    "The city council approved a new budget for public transport.",
    "More buses and trams will be funded by the municipality.",
    "He is learning to speak Japanese before his trip to Tokyo.",
    "The package arrived three days late.",
    "A quiet lake reflected the orange sky at sunset.",
    "The chef sharpened his knives before service.",
)

CALIBRATION_SENTENCES = (
    "The farmer harvested wheat at the end of the summer.",
    "Our team meeting has been moved to Thursday afternoon.",
    "The novel tells the story of a family across three generations.",
    "Heavy snowfall closed the mountain pass overnight.",
    "The doctor recommended more sleep and less caffeine.",
    "A robot vacuum cleaner cleans the living room every day.",
    "The election results will be announced tomorrow morning.",
    "Bees are essential for pollinating many crops.",
    "She bought a second-hand bicycle to commute to work.",
    "The spacecraft entered orbit around Mars.",
    "The bakery on the corner sells the best croissants in town.",
    "Parents gathered at the school for the annual concert.",
    "The database query took several minutes to complete.",
    "A thick fog covered the harbour at dawn.",
    "The painter used watercolours to capture the landscape.",
    "Inflation has made groceries noticeably more expensive.",
    "The tennis match went to a fifth set.",
    "Volunteers planted hundreds of trees along the river.",
    "He repaired the leaking tap with a new washer.",
    "The documentary explores life in the deep ocean.",
    "Our neighbours adopted a rescue dog last week.",
    "The airline introduced a new route to Lisbon.",
    "Solar panels were installed on the roof of the school.",
    "The poet read her latest work at the festival.",
    "Traffic was heavy on the motorway during the holidays.",
    "The chemistry experiment produced a bright green flame.",
    "The startup raised funding to expand into Asia.",
    "An old castle overlooks the village below.",
    "The nurse checked the patient's blood pressure.",
    "Chess requires patience, memory and careful planning.",
    "The river burst its banks after days of heavy rain.",
    "He wrote a letter to thank his former teacher.",
    "The museum shop sells postcards and art books.",
    "Scientists are studying how birds navigate during migration.",
    "The printer ran out of ink in the middle of the report.",
    "A jazz trio played softly in the hotel lobby.",
    "The government plans to build more affordable housing.",
    "The marathon route passes through the historic centre.",
    "She translated the manual from German into English.",
    "Fresh strawberries are in season this month.",
)

# Short passages (each well under 128 tokens) that add to the sentences above when a method needs
# many calibration tokens: SparseGPT solves a least-squares problem per layer whose inputs have
# up to 1536 features, and the sentences alone give ~480 tokens.
CALIBRATION_PASSAGES = (
    "Every spring the valley fills with wild flowers. Farmers plough the fields, shepherds move "
    "their flocks to higher pastures, and the first tourists arrive with walking boots and maps. "
    "By June the river is warm enough for swimming, and the small inn by the bridge is full "
    "every weekend.",
    "To make a simple tomato sauce, soften a chopped onion in olive oil, add two cloves of garlic "
    "and cook for a minute. Pour in a tin of crushed tomatoes, season with salt, pepper and a "
    "pinch of sugar, and let it simmer for twenty minutes while the pasta cooks.",
    "The city was founded by traders who settled where two rivers meet. Over the centuries it grew "
    "into a busy port with warehouses, markets and a cathedral, and its university, opened in the "
    "fifteenth century, still attracts students from all over the world.",
    "In the final minutes of the match the visitors equalised with a header from a corner. The home "
    "side pushed forward for a winner, but the goalkeeper saved two close-range shots, and the "
    "referee blew the whistle with the score at two goals each.",
    "Modern processors execute several instructions per cycle. They predict the outcome of "
    "branches, reorder independent operations and keep recently used data in small, fast caches, "
    "so a program that reads memory in a predictable order often runs many times faster than one "
    "that jumps around at random.",
    "Before travelling abroad, check that your passport is valid for at least six months, find out "
    "whether you need a visa, and buy travel insurance. It is also wise to carry a copy of your "
    "documents and to tell your bank which countries you will visit.",
    "A balanced diet includes vegetables, fruit, whole grains and enough protein. Drinking water "
    "throughout the day, sleeping seven to nine hours and walking for half an hour lower the risk "
    "of many chronic diseases, according to most public health guidelines.",
    "The company reported higher revenue for the third quarter, driven by strong demand for its "
    "cloud services. Profit margins narrowed, however, because of rising salaries and the cost of "
    "new data centres, and the shares fell slightly in early trading.",
    "Coral reefs cover a tiny fraction of the ocean floor but shelter about a quarter of all marine "
    "species. Warmer water causes corals to expel the algae that feed them, and repeated bleaching "
    "events have damaged large parts of several reefs in recent decades.",
    "Under the new rules, landlords must give tenants two months' notice before raising the rent, "
    "and any increase can take effect only once a year. Tenants who believe an increase is unfair "
    "may ask an independent tribunal to review it.",
    "The teacher divided the class into small groups. Each group chose a local problem, such as "
    "litter in the park or a dangerous crossing near the school, interviewed residents, and "
    "presented a plan to the town council at the end of the term.",
    "The quartet opened with a slow movement by Haydn, followed by a lively piece by a young "
    "composer from Argentina. After the interval they played Schubert's last string quartet, and "
    "the audience called them back for two encores.",
    "Astronomers have found thousands of planets orbiting other stars. Most were detected by the "
    "tiny dip in brightness when a planet passes in front of its star; a few of them are rocky, "
    "about the size of the Earth, and lie at a distance where liquid water could exist.",
    "On weekday mornings the station is crowded with commuters. Cyclists weave between buses, cafes "
    "sell coffee through open windows, and street sweepers finish their rounds before the shops "
    "raise their shutters at nine.",
    "The software update fixes a bug that could make the application crash when a file name "
    "contained unusual characters. It also speeds up start-up, adds a dark theme and lets users "
    "export their data as a spreadsheet.",
    "Grandmother kept a diary for sixty years. In small, careful handwriting she recorded the "
    "weather, the price of bread, letters from relatives abroad and the names of every cat the "
    "family ever owned.",
)
